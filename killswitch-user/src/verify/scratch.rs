//! A throwaway network namespace for one thread: where `verify` runs its generated packets, so
//! that nothing it does can reach the machine's own interfaces, firewall or counters.

use crate::error::{Error, Result};

/// The interfaces the generated packets use, as the policy sees them.
pub const TUNNEL: &str = "tun0";
pub const UPLINK: &str = "up0";
pub const OTHER: &str = "other0";

/// The scratch namespace as `f` sees it: the ifindex of each interface.
pub struct Scratch {
    pub tunnel: u32,
    pub uplink: u32,
    pub other: u32,
}

/// Runs `f` on a thread of its own in a new network namespace with `lo` and three veth pairs
/// (`tun0`, `up0`, `other0`, and their peers `tun0p`, ..., all up). The namespace goes when the thread and the processes it
/// started have ended.
pub fn run<T: Send>(f: impl FnOnce(&Scratch) -> Result<T> + Send) -> Result<T> {
    run_with_devices(&[], f)
}

/// [`run`], with a veth of each of `names` that the namespace lacks besides (its peer `ksgN`):
/// the live scope's netdev chains hook devices by name, and a kernel before 6.16 refuses a
/// chain on a device that does not exist.
pub fn run_with_devices<T: Send>(
    names: &[String],
    f: impl FnOnce(&Scratch) -> Result<T> + Send,
) -> Result<T> {
    std::thread::scope(|threads| {
        threads
            .spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(|e| Error::kernel("cannot make a scratch network namespace", e))?;
                let scratch = make_links(names)?;
                f(&scratch)
            })
            .join()
            .unwrap_or_else(|_| {
                Err(Error::Runtime(
                    "the scratch namespace's thread panicked".into(),
                ))
            })
    })
}

fn make_links(extra: &[String]) -> Result<Scratch> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| Error::kernel("cannot start a netlink runtime", e))?;
    runtime.block_on(async {
        let failed = |e: &dyn std::fmt::Display| {
            Error::kernel("cannot make the scratch interfaces", e.to_string())
        };
        let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| failed(&e))?;
        tokio::spawn(connection);
        let up = |index: u32| {
            handle
                .link()
                .set(rtnetlink::LinkUnspec::new_with_index(index).up().build())
                .execute()
        };
        up(1).await.map_err(|e| failed(&e))?;
        let index = |name: &str| {
            nix::net::if_::if_nametoindex(name).map_err(|e| failed(&format!("{name}: {e}")))
        };
        for name in [TUNNEL, UPLINK, OTHER] {
            let peer = format!("{name}p");
            handle
                .link()
                .add(rtnetlink::LinkVeth::new(name, &peer).up().build())
                .execute()
                .await
                .map_err(|e| failed(&e))?;
            up(index(&peer)?).await.map_err(|e| failed(&e))?;
        }
        for (i, name) in extra.iter().enumerate() {
            if nix::net::if_::if_nametoindex(name.as_str()).is_ok() {
                continue;
            }
            handle
                .link()
                .add(rtnetlink::LinkVeth::new(name, &format!("ksg{i}")).build())
                .execute()
                .await
                .map_err(|e| failed(&format!("{name}: {e}")))?;
        }
        Ok(Scratch {
            tunnel: index(TUNNEL)?,
            uplink: index(UPLINK)?,
            other: index(OTHER)?,
        })
    })
}
