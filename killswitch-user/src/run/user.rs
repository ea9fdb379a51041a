//! Who the command runs as: `sudo killswitch run -- firefox` starts firefox as the user who ran
//! sudo, not as root (an app running as root could leave its cgroup, or set the VPN client's
//! mark). Without sudo, as the caller.

use std::ffi::CString;

use nix::unistd::{Gid, Uid, User};

use crate::error::{Error, Result};

/// The identity to take before executing the command.
pub struct Invoker {
    pub uid: Uid,
    pub gid: Gid,
    groups: Vec<libc::gid_t>,
    pub name: String,
    pub home: std::path::PathBuf,
}

impl Invoker {
    /// The user behind `sudo` (`SUDO_UID`), when root runs killswitch for someone else; `None`
    /// without sudo. A `SUDO_UID` that names no usable user is an error: the app would run as
    /// root instead.
    pub fn from_sudo() -> Result<Option<Invoker>> {
        let Some(text) = std::env::var_os("SUDO_UID") else {
            return Ok(None);
        };
        let unusable = || {
            Error::Runtime(format!(
                "SUDO_UID={} names no user to run the command as; refusing to run it as root",
                text.to_string_lossy()
            ))
        };
        let uid: u32 = text
            .to_str()
            .and_then(|t| t.parse().ok())
            .ok_or_else(unusable)?;
        if uid == 0 || !Uid::effective().is_root() {
            return Ok(None);
        }
        let user = User::from_uid(Uid::from_raw(uid))
            .ok()
            .flatten()
            .ok_or_else(unusable)?;
        let name = CString::new(user.name.clone()).map_err(|_| unusable())?;
        // Looked up now: between fork and exec only system calls are safe.
        let groups = nix::unistd::getgrouplist(&name, user.gid).map_err(|_| unusable())?;
        Ok(Some(Invoker {
            uid: user.uid,
            gid: user.gid,
            groups: groups.iter().map(|g| g.as_raw()).collect(),
            name: user.name,
            home: user.dir,
        }))
    }

    /// Takes the identity (in the child, before exec): groups, then group, then user, which
    /// also drops every capability.
    pub fn become_it(&self) -> std::io::Result<()> {
        // SAFETY: plain system calls on values prepared before the fork; nothing allocates.
        // Ambient capabilities would survive the change of user: cleared first.
        let failed = unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ) != 0
                || libc::setgroups(self.groups.len(), self.groups.as_ptr()) != 0
                || libc::setgid(self.gid.as_raw()) != 0
                || libc::setuid(self.uid.as_raw()) != 0
        };
        if failed {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}
