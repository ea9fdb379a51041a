//! Where `run` makes its cgroup: next to the caller's, inside every scope that holds the caller,
//! and only below directories that root alone can change. In a user's delegated subtree
//! (`user@1000.service`) the user could move the app out of its scope, or one of their own
//! processes into the VPN client's cgroup.

use std::{
    os::unix::fs::{DirBuilderExt, MetadataExt},
    path::{Path, PathBuf},
};

use crate::{
    error::{Error, Result},
    scope::Scope,
};

/// What the cgroup is for; each has its own parent directory, so a name never means both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    App,
    VpnClient,
}

impl Kind {
    fn parent(self) -> &'static str {
        match self {
            Kind::App => "killswitch",
            Kind::VpnClient => "killswitch-vpn-client",
        }
    }
}

/// This process's cgroup, relative to the cgroup2 mount.
fn own_cgroup() -> Result<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| Error::io("cannot read", "/proc/self/cgroup", e))?;
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| Error::Runtime("this process is in no cgroup v2".into()))?;
    Ok(PathBuf::from(path.trim_start_matches('/')))
}

/// The cgroup (relative to `mount`) for a run named `name`, given the scopes in force.
pub fn cgroup_for(mount: &Path, name: &str, kind: Kind, enforced: &[Scope]) -> Result<PathBuf> {
    let caller = own_cgroup()?;
    // Next to the caller's cgroup; inside it when it is a scope itself (a sibling would not be).
    let mut base = if enforced.iter().any(|s| s.relative == caller) {
        caller.clone()
    } else {
        caller.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    // Every directory from the mount down must be root's alone: moving a process needs write
    // access to the lowest directory holding both places, wherever that is.
    while !base.as_os_str().is_empty() && !root_only_down_to(mount, &base) {
        base = base.parent().map(Path::to_path_buf).unwrap_or_default();
    }
    let relative = base.join(kind.parent()).join(name);
    if let Some(outside) = enforced
        .iter()
        .find(|s| caller.starts_with(&s.relative) && !relative.starts_with(&s.relative))
    {
        return Err(Error::Runtime(format!(
            "cannot make the cgroup inside {}, the scope that holds you: a directory in it can be \
             changed by others than root",
            outside.display_cgroup()
        )));
    }
    Ok(relative)
}

/// Whether `relative` and every directory above it up to `mount` are root's alone.
fn root_only_down_to(mount: &Path, relative: &Path) -> bool {
    relative
        .ancestors()
        .filter(|a| !a.as_os_str().is_empty())
        .all(|a| root_only(&mount.join(a)))
}

/// A directory (and its `cgroup.procs`) that only root can change.
fn root_only(dir: &Path) -> bool {
    let only_root = |path: &Path| {
        std::fs::symlink_metadata(path).is_ok_and(|m| m.uid() == 0 && m.mode() & 0o022 == 0)
    };
    only_root(dir) && only_root(&dir.join("cgroup.procs"))
}

/// Makes the run's cgroup and its parent, or takes them as they are when root alone made them
/// (another run of the same name); anything else there is refused, and so is a place that
/// stopped being root's alone since it was chosen.
pub fn make(mount: &Path, cgroup: &Path) -> Result<()> {
    let parent = cgroup.parent().unwrap_or(cgroup);
    let above = parent.parent().unwrap_or(parent);
    let relative = above.strip_prefix(mount).unwrap_or(above);
    if !root_only_down_to(mount, relative) {
        return Err(Error::Runtime(format!(
            "{} can be changed by others than root; refusing to run below it",
            above.display()
        )));
    }
    for dir in [parent, cgroup] {
        match std::fs::DirBuilder::new().mode(0o755).create(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if !root_only(dir) {
                    return Err(Error::Runtime(format!(
                        "{} exists and others than root can change it; refusing to run in it",
                        dir.display()
                    )));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(Error::Runtime(format!(
                    "cannot create the cgroup {}: permission denied; run killswitch as root",
                    dir.display()
                )))
            }
            Err(e) => return Err(Error::io("cannot create the cgroup", dir, e)),
        }
    }
    Ok(())
}

/// Whether processes are in the cgroup. Only a cgroup that is gone is empty for certain; a
/// file that cannot be read counts as populated (the scope stays).
pub fn populated(cgroup: &Path) -> bool {
    match std::fs::read_to_string(cgroup.join("cgroup.events")) {
        Ok(text) => !text.lines().any(|l| l == "populated 0"),
        Err(e) => e.kind() != std::io::ErrorKind::NotFound,
    }
}

/// Whether the removed cgroup of a scope is released: it lives on while a socket made in it is
/// open (a closed TCP connection still sending its last data), and its scope must hold those
/// packets until then. eBPF: the kernel detaches the scope's links at that moment. nftables:
/// no removed cgroup is left below the parent (a parent that is gone cannot tell: not yet).
pub fn released(scope: &Scope) -> bool {
    if crate::ebpf::is_pinned(scope) {
        return crate::ebpf::links_released(scope);
    }
    let parent = scope.cgroup.parent().unwrap_or(&scope.cgroup);
    std::fs::read_to_string(parent.join("cgroup.stat")).is_ok_and(|text| {
        text.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["nr_dying_descendants", "0"])
    })
}

/// Whether a scope is one `run` made (its cgroup's parent is `killswitch`).
pub fn made_by_run(scope: &Scope) -> bool {
    scope
        .relative
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|p| p == Kind::App.parent())
}
