//! Who the command runs as: `sudo killswitch run -- firefox` starts firefox as the user who ran
//! sudo, not as root (an app running as root could leave its cgroup, or set the VPN client's
//! mark). Without sudo, as the caller.

use std::ffi::CString;

use nix::unistd::{Gid, Uid, User};

/// The identity to take before executing the command.
pub struct Invoker {
    pub uid: Uid,
    pub gid: Gid,
    groups: Vec<libc::gid_t>,
    pub name: String,
    pub home: std::path::PathBuf,
}

impl Invoker {
    /// The user behind `sudo` (`SUDO_UID`), when root runs killswitch for someone else.
    pub fn from_sudo() -> Option<Invoker> {
        if !Uid::effective().is_root() {
            return None;
        }
        let uid: u32 = std::env::var("SUDO_UID").ok()?.parse().ok()?;
        if uid == 0 {
            return None;
        }
        let user = User::from_uid(Uid::from_raw(uid)).ok()??;
        let name = CString::new(user.name.clone()).ok()?;
        // Looked up now: between fork and exec only system calls are safe.
        let groups = nix::unistd::getgrouplist(&name, user.gid).ok()?;
        Some(Invoker {
            uid: user.uid,
            gid: user.gid,
            groups: groups.iter().map(|g| g.as_raw()).collect(),
            name: user.name,
            home: user.dir,
        })
    }

    /// Takes the identity (in the child, before exec): groups, then group, then user, which
    /// also drops every capability.
    pub fn become_it(&self) -> std::io::Result<()> {
        // SAFETY: plain system calls on values prepared before the fork; nothing allocates.
        let failed = unsafe {
            libc::setgroups(self.groups.len(), self.groups.as_ptr()) != 0
                || libc::setgid(self.gid.as_raw()) != 0
                || libc::setuid(self.uid.as_raw()) != 0
        };
        if failed {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}
