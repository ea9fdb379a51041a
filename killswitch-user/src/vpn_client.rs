//! `[vpn_client]`: the cgroups whose sockets may use the server exception. A cgroup is trusted
//! by id, as it exists now: a client's cgroup removed and made again (systemd restarts a unit
//! in a new one) is a new id, which `up` and the daemon look up again. A cgroup that does not
//! exist trusts no one. Besides the config's cgroup, `killswitch run --vpn-client` registers
//! the cgroup it starts the client in, in a registry every scope's apply reads.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use crate::{
    error::{Error, Result},
    policy::Policy,
    scope,
};

/// A VPN client's cgroup as it is now.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClientCgroup {
    /// Relative to the cgroup2 root, without leading or trailing `/`.
    pub path: String,
    /// Its depth: `a/b` is level 2.
    pub level: u32,
    /// Its id (the directory's inode), as `bpf_skb_ancestor_cgroup_id` gives it.
    pub id: u64,
}

impl ClientCgroup {
    /// The cgroup at `path` below the cgroup2 mount, if it exists now.
    pub fn find(mount: &Path, path: &str) -> Option<ClientCgroup> {
        let path = path.trim_matches('/');
        let level = path.split('/').filter(|c| !c.is_empty()).count() as u32;
        if level == 0 || level > killswitch_common::MAX_VPN_CLIENT_LEVEL {
            return None;
        }
        let meta = std::fs::metadata(mount.join(path)).ok()?;
        meta.is_dir().then(|| ClientCgroup {
            path: path.to_owned(),
            level,
            id: meta.ino(),
        })
    }
}

/// The client cgroups of `policy` that exist now: its `cgroup`, and the ones registered with
/// `run --vpn-client` (each only while it is the very cgroup registered, same id). Empty when
/// the policy has no `[vpn_client]` (the servers are then open to every socket, and no cgroup
/// is asked).
pub fn current(policy: &Policy) -> Vec<ClientCgroup> {
    let Some(client) = &policy.vpn_client else {
        return Vec::new();
    };
    let Ok(mount) = scope::cgroup2_mount() else {
        return Vec::new();
    };
    let configured = client
        .cgroup
        .iter()
        .filter_map(|path| ClientCgroup::find(&mount, path));
    let registered = registered()
        .into_iter()
        .filter_map(|(path, id)| ClientCgroup::find(&mount, &path).filter(|found| found.id == id));
    let mut found: Vec<ClientCgroup> = configured.chain(registered).collect();
    found.sort();
    found.dedup_by_key(|c| c.id);
    found.truncate(killswitch_common::MAX_VPN_CLIENTS as usize);
    found
}

/// Where `run --vpn-client` records its cgroups: one file per cgroup, named by its path
/// (escaped like a scope's name), holding its id.
fn registry() -> PathBuf {
    crate::state::dir().join("vpn-clients")
}

/// The cgroups registered now: (path, id).
pub fn registered() -> Vec<(String, u64)> {
    let Ok(dir) = std::fs::read_dir(registry()) else {
        return Vec::new();
    };
    dir.filter_map(|entry| {
        let entry = entry.ok()?;
        let id = std::fs::read_to_string(entry.path())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let path = scope::unescape_path(entry.file_name().to_str()?);
        Some((path.to_str()?.to_owned(), id))
    })
    .collect()
}

/// Records a VPN client's cgroup.
pub fn register(client: &ClientCgroup) -> Result<()> {
    let dir = registry();
    crate::state::make_dir(&dir)?;
    let file = dir.join(scope::escape_path(Path::new(&client.path)));
    std::fs::write(&file, client.id.to_string()).map_err(|e| Error::io("cannot write", &file, e))
}

/// Forgets a registered cgroup.
pub fn unregister(path: &str) {
    let _ = std::fs::remove_file(registry().join(scope::escape_path(Path::new(path))));
}

/// The path (relative to the cgroup2 mount) of the cgroup whose id is `id`, if it exists.
pub fn path_of(id: u64) -> Option<String> {
    let mount = scope::cgroup2_mount().ok()?;
    let full = crate::events::cgroup_by_id(&mount, id)?;
    let relative = full.strip_prefix(&mount).ok()?;
    Some(relative.to_string_lossy().into_owned())
}
