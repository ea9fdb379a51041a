//! Network interfaces of the current network namespace, and the namespace's cookie (the value
//! `bpf_get_netns_cookie` returns for its packets).

use std::os::fd::AsRawFd;

use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};

use crate::{
    error::{Error, Result},
    policy::InterfacePattern,
};

/// `SO_NETNS_COOKIE` (linux/socket.h), not yet exported by libc for every target.
const SO_NETNS_COOKIE: libc::c_int = 71;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Interface {
    pub index: u32,
    pub name: String,
}

/// Every interface of the current network namespace.
pub fn list() -> Result<Vec<Interface>> {
    let interfaces = nix::net::if_::if_nameindex()
        .map_err(|e| Error::kernel("cannot list network interfaces", e))?;
    let mut list: Vec<Interface> = interfaces
        .iter()
        .map(|i| Interface {
            index: i.index(),
            name: i.name().to_string_lossy().into_owned(),
        })
        .collect();
    list.sort();
    Ok(list)
}

/// The interfaces matching any of `patterns`.
pub fn matching(all: &[Interface], patterns: &[InterfacePattern]) -> Vec<Interface> {
    all.iter()
        .filter(|i| patterns.iter().any(|p| p.matches(&i.name)))
        .cloned()
        .collect()
}

/// Name of `index` in the current namespace, if it exists.
pub fn name_of(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let ptr = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    Some(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// The cookie of the current network namespace.
pub fn netns_cookie() -> Result<u64> {
    let sock = socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Error::kernel("cannot open a socket", e))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie and len are valid for the kernel to write a u64.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(Error::kernel(
            "cannot read the network namespace cookie (SO_NETNS_COOKIE needs Linux 5.14)",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(cookie)
}
