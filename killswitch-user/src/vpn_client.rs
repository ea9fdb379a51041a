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

/// The path (relative to the cgroup2 mount) of the cgroup whose id is `id`, if it exists: the
/// kernel opens it by its handle (cgroup ids are kernfs file handles), and /proc names it.
pub fn path_of(id: u64) -> Option<String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    /// `struct file_handle` with room for the 8-byte kernfs id.
    #[repr(C)]
    struct Handle {
        bytes: u32,
        kind: i32,
        id: u64,
    }
    /// FILEID_KERNFS.
    const KERNFS: i32 = 0xfe;
    let mount = scope::cgroup2_mount().ok()?;
    let root = std::fs::File::open(&mount).ok()?;
    let mut handle = Handle {
        bytes: 8,
        kind: KERNFS,
        id,
    };
    // SAFETY: `handle` is a file_handle header followed by its 8 bytes, valid for the call.
    let fd = unsafe {
        libc::open_by_handle_at(
            root.as_raw_fd(),
            (&mut handle as *mut Handle).cast(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let full = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    let relative = full.strip_prefix(&mount).ok()?;
    Some(relative.to_string_lossy().into_owned())
}
